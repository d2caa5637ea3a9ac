"""Local copies inside one storage system: Thin Image snapshots and ShadowImage pairs."""
