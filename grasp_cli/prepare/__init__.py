"""`grasp prepare`: documents in, tokenized corpus and task shards out."""
