"""The fsmeta: an image's layers merged into one metadata-only EROFS (or one flat device)."""
