import os

# Tests never touch the network: datasets build offline into the repo's data dir (cached
# across runs) unless MTFL_DATA_DIR says otherwise.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
