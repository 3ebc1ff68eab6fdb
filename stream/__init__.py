"""The streaming half of promo-stream: events in, state, decisions out."""
