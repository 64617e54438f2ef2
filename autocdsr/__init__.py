"""AutoCDSR / AutoCDSR+ cross-domain sequential recommendation."""
