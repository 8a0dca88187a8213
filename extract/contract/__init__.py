"""The contract between the stages: everything stage 2 (train/) may know of stage 1 (extract/).

Stage 1 writes a cache store; stage 2 reads it. They meet here and nowhere else:

- `schema`   the cache's arrays, dimensions, attributes and schema version, declared once; `open_cache` reads a
             store and refuses another version with a sentence saying how to upgrade it.
- `store`    creating a store from the schema, writing rows (`done` last), reopening one to resume.
- `lock`     one writer per folder (a store, a training run): `<folder>/ltar.lock`, stale locks taken over.
- `locate`   the `cache` section, and the pointer through which stage 2 finds the store stage 1 wrote for a
             configuration (keyed by its resolved stage-1 sections), without recomputing its fingerprint.
- `config`   the loader: sections registered by the packages that own them (entry points `causal_ltar.config`),
             override files, folders of named entries, `--set`, every key checked with its full path.
- `cli`      the `ltar` app both stages add commands to, the options every command takes, exit codes, and the
             mapping of every way a command ends to one sentence.
- `cluster`  the hook through which stage 2 runs tasks on a dask cluster without importing dask.

Rules (bench/imports.py --check, run by `make lint` and the tests): this package imports nothing else of the
project and none of torch, torchvision, open_clip, timm, av, faiss or dask.distributed; train/ imports only this
package of extract/ (train/main.py, the console script, excepted); extract/ never imports train/; no circles.
"""
