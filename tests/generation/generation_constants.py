"""Sizes the generation tests share. A uniquely named module, not `conftest`: tests/interop has a
conftest of its own, and two modules both imported as `conftest` shadow each other in one run."""
VOCAB, CTX, EOS = 64, 64, 7
