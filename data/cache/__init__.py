"""The feature cache: HDF5 shards plus one index file. This package owns the schema.

Modules: `meta` (CacheMeta, versions, policies, errors), `layout` (shard names, chunks, int8, raw
offsets), `integrity` (checksums), `handles` (per-process open files), `write` (`write_shard`,
`build_index`), `read` (`open_cache`, `Cache`), `check` (`check_shard`, `verify`, `info`), `store`
(`FeatureStore`, torch) and `view` (`dask_view`). The names below are re-exported here.

A cache is a folder of shards (each a contiguous slice of the sorted clip list, written by
`write_shard`) and an index file (`feats.h5`, written by `build_index`) that users pass around.

Shard file (`shard-00000.h5`), N clips, L layers, T pooled frames, D dims, C classes:

    =============== ======== ============ ============================== ===========================
    dataset         dtype    shape        chunks                         notes
    =============== ======== ============ ============================== ===========================
    ids             utf-8    [N]          -                              variable-length strings
    features        f16|i8   [N, L, T, D] (k, L, T, D), k = 1..4         k*record ~ <= 1 MiB
    mean            f16|i8   [N, L, D]    (min(256, N), 1, D)            time mean, computed in fp32
    features_scale  f32      [L, D]       -                              int8 storage only
    mean_scale      f32      [L, D]       -                              int8 storage only
    features_crc32  uint32   [N]          -                              zlib CRC-32 of each clip's row
    mean_crc32      uint32   [N]          -                              as stored (f16|i8, C order); v2+
    mean_layer_crc32 uint32  [N, L]       -                              per clip and layer; optional
    label_indptr    int32    [N + 1]      -                              CSR: clip i has labels
    label_indices   int32    [nnz]        -                              indices[indptr[i]:indptr[i+1]]
    fold            int16    [N]          -                              -1 = no fold
    duration        f32      [N]          -                              seconds of real audio
    --------------- -------- ------------ ------------------------------ ---------------------------
    optional columns (`COLUMNS`; present when the meta's `columns` names them, in every shard):
    snr             f32      [N]          -                              dB of a noisy-speech mixture
    utterance       utf-8    [N]          -                              speech id of the mixture
    =============== ======== ============ ============================== ===========================

    No compression: fp16 activations gain only ~1.1x from gzip+shuffle and reads get slower.
    Rows of `features` are stored whole and in order inside each chunk, so a reader can copy a row
    straight from the file (`row_offsets`) instead of going through the HDF5 library.

Storage precision (`storage` attribute): "fp16" stores the values; "int8" stores
round(x / scale) clipped to +-127 with one scale per (layer, channel) per shard and field,
scale = max |x| / 127 over the shard's clips (and frames): the error of a value is at most
scale / 2. Readers dequantise (`x = q * scale`, as f16) — on the device the features go to — so
nothing downstream sees the stored precision. Layer subsets (`layers` attribute): the encoder block
index of each stored layer (`wat-extract --layers 8:32`); L = len(layers).

    Checksums (schema 2+): written from the very arrays that go to disk, so any later change of a
    byte of a clip's `features` or `mean` row (a bad disk, a truncated copy, a stray write) is
    detected by `verify` and by the readers, which check each shard the first time a process reads
    it (`check_rows`). `mean_layer_crc32` holds one CRC-32 per clip and layer of `mean`, so that a read
    of one layer (a probe's) is checked on its own (`check_layer_block`) instead of the whole field
    first (32x one layer's bytes at large width: BENCHMARKS.md); it is optional integrity data, not
    a schema change: shards written before it (no dataset) read as they did, with the whole-field
    check, and older readers ignore it. CRC-32 rather than a cryptographic hash: it guards against accidents, not
    attackers, and zlib's runs at memory speed (BENCHMARKS.md: verify vs a plain read). Schema 1
    shards (no checksums) still open; for them readers refuse rows that are all zero or non-finite,
    and `verify`/`info` say that the shards carry no checksums.

    Field checksums (`field_crc32`, every shard and index written since issue 25): everything else
    that decides a result is covered too. The attribute is JSON {dataset: CRC-32 of its bytes, ...,
    "@attrs": CRC-32 of the file's other attributes}, over every dataset but `features` and `mean`
    (whose rows have their own) and the index's virtual datasets: ids, labels (`label_indptr`,
    `label_indices`), `fold`, `duration`, the int8 scales, the optional columns, the row checksums
    themselves, and in the index `shard_paths`, `shard_rows`, `shard_digests` and
    `shard_field_crc32` (utf-8 [S]: each shard's `field_crc32` as the index was built over it, so a
    shard whose record was removed or rewritten is refused). Bytes are hashed as stored, strings
    before decoding (`integrity.field_bytes`), so a flipped byte is a checksum failure, never a
    decode error. Written last by `integrity.seal`; checked by `open_cache` on every field it reads
    (the index's, and each shard's attributes), by `Cache` when it reads a shard's scales or row
    checksums, by `check_layer_block`, by `build_index` on every shard field it copies, and in full by
    `check_shard`/`verify` (which also compare each shard's per-clip fields with the index's copies).
    Any failure is one CacheError line naming the file and the field. Like `mean_layer_crc32` this
    is optional integrity data, not a schema change (no version bump): older files have no
    `field_crc32` and read as before, with structural checks only (label CSR in range, one entry
    per clip), and older readers ignore the attribute and the index dataset.

Attributes (shard and index alike): `schema_version`, `kind` ("shard" | "index"), `model`,
`fingerprint`, `n_layers`, `n_frames`, `dim`, `policy`, `pad30_padding`, `pooling`, `sample_rate`, `clip_seconds`,
`vocab` (Vocabulary JSON), `multilabel`, `dataset`, `versions` (JSON), `storage`, `layers` (JSON
list), `columns` (JSON list of the optional columns present; absent = none, so caches written
before columns existed stay valid and keep their digests); shards also `n_clips` and `digest`
(sha256 of the ids and the meta, so a shard swapped for another is detected). `schema_version` is
the oldest reader that reads the file right: 2 for fp16 caches of every layer (version 1 plus
checksums; `storage`/`layers` absent means fp16/all), 3 for int8 or layer-subset caches, which a
version-2 reader would misread, 4 for pad30 caches (`pad30_padding` = "mel": the window
`whisper.transcribe` feeds the encoder, padded with zero log-mel frames; a version-3 reader would
take them for the older pad30 features and mix the two). pad30 files of versions 1-3 have no
`pad30_padding` attribute: their windows were padded with zero *samples* before the log-mel
("samples"), which is not what transcription feeds the encoder; they are still read, but never
next to "mel" features (`incompatibilities`, and `wat.data.heads.head_problems` for heads trained on them).
Trim caches have no padding (`pad30_padding` absent, "" in `CacheMeta`) and keep versions 2/3.
Version 5: caches of a non-Whisper encoder (`encoder` attribute: its family, "hf", "crepe", ...;
absent = "whisper", so Whisper caches are written as before); a version-4 reader would take them
for Whisper features. What the features are is `CacheMeta.spec` (`wat.data.spec.FeatureSpec`).
Version 1 files (no checksums) are still read. Optional columns are
per-clip metadata that a reader may use or ignore (wat-robust writes `snr` and `utterance`;
wat-probe/wat-train ignore them); a new one is one row in `COLUMNS`. Caches whose shards hold
different column sets are incompatible.

Index file (`feats.h5`): `features` and `mean` are HDF5 virtual datasets over the shards with
source paths relative to the index's folder (HDF5 resolves them there, so the folder can be moved;
missing sources read as NaN, never zeros); `ids`, `label_indptr`, `label_indices`, `fold`,
`duration` and the optional columns are copied in; `shard_paths` (utf-8, relative), `shard_rows`
(int64), `shard_digests` (utf-8) and `shard_field_crc32` (utf-8, see field checksums) record the shards; int8 caches also copy each shard's scales
into `features_scale` and `mean_scale` [S, L, D] (the virtual datasets hold the raw int8 values).
`open_cache` checks every shard against these records before any read,
and `Cache.read` reads the shards directly, so a VDS fill value can never reach a caller.

Atomicity: every file is written to a `.partial` file beside NAME, flushed, fsynced, closed and `os.replace`d onto
NAME (then the folder is fsynced; `files.atomic_path`): a file with the final name is always whole.
"""
from .check import check_shard, info, verify
from .handles import raw_fd
from .integrity import check_layer_block, layer_crc32, row_crc32
from .layout import dequantize, layer_chunk_offsets, quantize, row_offsets, shard_path
from .meta import (CHECKSUMS, COLUMNS, FIELDS, MEAN_LAYER_CRC, PAD30_FIX, PAD30_PADDING, PAD30_PADDINGS, POLICIES,
                   READABLE_VERSIONS, SCHEMA_VERSION, STORAGES, CacheError, CacheMeta, CorruptCacheError, padding_of)
from .read import Cache, open_cache
from .view import dask_view
from .write import build_index, write_shard

__all__ = ["open_cache", "Cache", "CacheMeta", "CacheError", "CorruptCacheError", "write_shard", "build_index",
           "shard_path", "check_shard", "verify", "info", "POLICIES", "STORAGES", "SCHEMA_VERSION",
           "READABLE_VERSIONS", "FIELDS", "CHECKSUMS", "MEAN_LAYER_CRC", "COLUMNS", "PAD30_PADDING",
           "PAD30_PADDINGS", "PAD30_FIX", "padding_of", "row_crc32", "layer_crc32", "check_layer_block",
           "quantize", "dequantize", "row_offsets", "layer_chunk_offsets", "raw_fd", "FeatureStore", "dask_view"]


def __getattr__(name):
    # the training reader imports torch: load it only when asked for
    if name == "FeatureStore":
        from .store import FeatureStore
        return FeatureStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
