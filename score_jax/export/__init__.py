"""Export: trained models as directories that Hugging Face transformers and vLLM load."""
