"""KEK sources (see :mod:`cuscred.kek.source`)."""
