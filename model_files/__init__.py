"""Model files on disk: the manifest that proves them complete, and archives to carry them offline."""
