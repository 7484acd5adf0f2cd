"""Token generation loops for the chat: one engine per framework, same interface."""
