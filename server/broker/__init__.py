"""Brokers: sequencing, history and cross-node delivery behind one interface."""
