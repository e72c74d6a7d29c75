"""Data pipeline: ftdp files, tokenization, packing strategies, mixing and the resumable loader.

    loader = build_packed_loader(train_folder="data/tokenized", seq_len=4096, micro_num=4, packing="cut")
    for step_batches in loader:           # list of micro_num PackedBatch, each [1, seq_len * micro_bsz]
        ...
"""

from .corpus import default_corpus_folder, default_documents, default_token_docs, default_tokenizer
from .ftdp import FtdpFile, FtdpWriter, list_bin_files, write_ftdp
from .loader import PackedLoader, build_packed_loader
from .packing import STRATEGIES

__all__ = ["FtdpFile", "FtdpWriter", "PackedLoader", "STRATEGIES", "build_packed_loader", "default_corpus_folder",
           "default_documents", "default_token_docs", "default_tokenizer", "list_bin_files", "write_ftdp"]
