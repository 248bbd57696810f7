"""Analysis tools: representation similarity (CKA) and reconstruction quality (PSNR)."""
