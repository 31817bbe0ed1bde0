"""`obelisk update serve`: a small Omaha server over a directory of releases (Nebraska-compatible wire format)."""
