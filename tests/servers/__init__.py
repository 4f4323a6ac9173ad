"""Real HTTP servers the resolver tests talk to (S3 via moto or rclone, a Hub-compatible server)."""
