"""The lab console: one live status page for every system of a ``vspemu up`` lab (vspemu.console.app)."""
