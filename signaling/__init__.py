"""The HTTP server: signaling, rooms, REST API and the web page."""
