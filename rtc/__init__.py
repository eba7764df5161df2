"""WebRTC transport: WHIP-style signaling and the server side of each peer connection."""
