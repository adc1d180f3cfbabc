"""Data modules: litdata pretraining streams (pretrain), the embedded corpus and tokenizer."""
