"""Result stores for large outputs (images): filesystem with signed URLs, S3 with presigned URLs."""
