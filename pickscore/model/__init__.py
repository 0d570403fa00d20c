"""Architecture, checkpoint formats, preprocessing, tokenizer and scoring math."""
