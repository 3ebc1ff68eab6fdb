"""The model half of promo-stream: a SASRec-style user encoder, usable without Kafka."""
