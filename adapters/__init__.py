"""The vendors' APIs and the legacy dialects, each a thin translation over the server's own sessions."""
