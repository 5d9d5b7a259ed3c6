"""Developer tools run from a checkout (not installed with fssmeta): `oracle` records the parity fixtures."""
