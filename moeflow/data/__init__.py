"""Text in, token batches out: the built-in corpus, the BPE tokenizer, the packed loader."""

from moeflow.data.corpus import Document, load_corpus, split_documents, stdlib_root
from moeflow.data.loader import BatchLoader, PackedTokens, micro_batches
from moeflow.data.tokenizer import BPETokenizer

__all__ = ["BPETokenizer", "BatchLoader", "Document", "PackedTokens", "load_corpus",
           "micro_batches", "split_documents", "stdlib_root"]
