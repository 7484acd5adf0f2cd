"""Metal kernel sources; each file imports only its kernel language (the Triton kernels: ``topkphi/triton``)."""
