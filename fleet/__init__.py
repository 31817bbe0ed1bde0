"""`obelisk fleet`: the operator's client for the update server's fleet API (no server code here)."""
