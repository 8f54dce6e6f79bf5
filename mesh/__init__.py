"""Mesh: boxes that find each other (mDNS), elect a head and form a Ray cluster."""
