"""chatd: a chat server whose identity lives in an encrypted session cookie."""
