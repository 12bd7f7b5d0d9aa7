"""The `pdcluster` command line (`pdcluster.cli`)."""
