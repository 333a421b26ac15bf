"""What the text-producing services (chat, vision) share: sampling parameters and the text
stream (stream), conversation normalisation (conversation), fitting a conversation into the
context (context) and output grammars (grammar)."""
