"""One file per schema revision, in order; never edit a revision that has shipped, add the next one."""
