"""The checkpoint zoo on disk (format version 1): Zarr v3 parameters, Parquet metadata, a manifest.

A zoo is a directory (or an fsspec URL such as ``memory://zoo`` or ``s3://bucket/zoo``)::

    ZOO/
      zoo.json          format "hyperforget-zoo", version 1: dataset, MLP spec, classes, pivots,
                        collection settings, normalization statistics, array settings
      params.zarr/      Zarr v3 array (rows, P) float32, chunks (chunk_rows, P) inside shards
                        (shard_rows, P), Blosc lz4 + shuffle (zoo.json names the compressor),
                        crc32c per chunk
      meta/part-NNNNNN.parquet   one row per checkpoint (see ``metadata_schema``)
      manifest.json     the commit point: committed row count, parts with their row ranges,
                        commit keys with their row ranges

Rows of ``params.zarr`` at or beyond ``manifest.json``'s ``num_rows`` are uncommitted (left by a
writer that died mid-commit) and are overwritten by the next commit; readers never return them.

Commits are atomic against a process dying at any instant: the writer (1) writes the new
parameter rows (zarr's LocalStore replaces each shard file by temp + rename, so a shard that also
holds committed rows is either the old or the new file, both with those rows intact), (2) writes
the batch's Parquet part by temp + rename, (3) replaces ``manifest.json`` by temp + rename. Only
step 3 publishes the batch. Reopening a zoo deletes parts that the manifest does not list and
temp files, and continues at the last commit.

One process commits to a zoo at a time. Locally this is enforced with ``fcntl.flock`` on
``ZOO/.lock`` (released by the kernel if the writer dies). For fsspec URLs there is no lock: the
caller must make sure a single process commits (the dask collector returns finished batches to
its client, which is the only committer). Each object store PUT is atomic, which is all the
commit protocol needs there.

Another project reads a zoo with plain ``zarr.open_array(ZOO + "/params.zarr")`` and
``pyarrow.parquet.read_table`` over the files listed in ``manifest.json``.

The package, one job per module (``from hyperforget.zoo.store import X`` keeps working for
every name below):

- ``format``: constants, compressors and their zarr codecs, :class:`ZooConfig` (zoo.json), the
  metadata schema and :func:`build_metadata`
- ``location``: a zoo's root (local directory or fsspec URL), zoo.json and manifest.json
- ``writer``: :func:`create_zoo`, :class:`ZooWriter`, :func:`compact`
- ``reader``: :func:`open_zoo`, :class:`ZooReader`
- ``shards``: the shard files read directly (chunk decoding, mapping), for the reader and the loader
- ``verify``: :func:`verify_zoo`, :class:`VerifyReport`, :func:`require_sound_zoo`
- ``stats``: :func:`compute_normalization`, :func:`zoo_info`
- ``progress``: progress bars for compaction and verification
"""

from hyperforget.zoo.store.format import (CHUNKS_PER_SHARD, COMPACT_FILE_ROWS, COMPACT_ROW_GROUP, COMPRESSORS,
                                          DEFAULT_COMPRESSOR, FORMAT, FORMAT_VERSION, LOCK, MANIFEST, MANIFEST_FORMAT,
                                          META_DIR, PARAMS, PHASES, REQUIRED_COLUMNS, TARGET_CHUNK_BYTES, TMP_DIR,
                                          ZOO_JSON, ZooConfig, build_metadata, compressor_codecs, default_chunk_rows,
                                          metadata_schema)
from hyperforget.zoo.store.reader import ZooReader, open_zoo
from hyperforget.zoo.store.stats import compute_normalization, zoo_info
from hyperforget.zoo.store.verify import VerifyReport, require_sound_zoo, verify_zoo
from hyperforget.zoo.store.writer import ZooWriter, compact, create_zoo

__all__ = [
    "CHUNKS_PER_SHARD", "COMPACT_FILE_ROWS", "COMPACT_ROW_GROUP", "COMPRESSORS", "DEFAULT_COMPRESSOR", "FORMAT",
    "FORMAT_VERSION", "LOCK", "MANIFEST", "MANIFEST_FORMAT", "META_DIR", "PARAMS", "PHASES", "REQUIRED_COLUMNS",
    "TARGET_CHUNK_BYTES", "TMP_DIR", "ZOO_JSON", "VerifyReport", "ZooConfig", "ZooReader", "ZooWriter",
    "build_metadata", "compact", "compressor_codecs", "compute_normalization", "create_zoo", "default_chunk_rows",
    "metadata_schema", "open_zoo", "require_sound_zoo", "verify_zoo", "zoo_info",
]
