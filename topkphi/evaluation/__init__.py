"""Task accuracy, next-token KL and attention-output error of decode policies at matched KV reads."""
