"""Reports of a build: terminal tables and the HTML page."""
