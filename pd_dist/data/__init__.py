"""Data: sources (the embedded corpus, raw text files, Megatron indexed datasets, blends of them),
preparation into Megatron-format token shards, and samples and their order for training.

- :mod:`.config`: the ``data`` config section;
- :mod:`.corpus`: the embedded default corpus (the Python standard library's sources and docs);
- :mod:`.documents`: raw-text readers, and the units of preparation work;
- :mod:`.indexed`: the Megatron indexed dataset format (``.bin`` + ``.idx``);
- :mod:`.prepare`: streaming, multi-process, multi-rank preparation and its manifests;
- :mod:`.dataset`: samples as windows over each source's token stream, and the (blended) sampler.
"""
from pd_dist.data.config import DataConfig, SourceConfig
from pd_dist.data.corpus import embedded_corpus_files, embedded_documents
from pd_dist.data.dataset import GlobalBatchSampler, MicroBatchPlan, PackedDataset, blend_schedule
from pd_dist.data.documents import DataError
from pd_dist.data.prepare import EOS, blend_counts, load_tokenizer, prepare_data, resolve_sources, train_tokenizer

__all__ = ["DataConfig", "SourceConfig", "DataError", "EOS", "GlobalBatchSampler", "MicroBatchPlan",
           "PackedDataset", "blend_counts", "blend_schedule", "embedded_corpus_files", "embedded_documents",
           "load_tokenizer", "prepare_data", "resolve_sources", "train_tokenizer"]
