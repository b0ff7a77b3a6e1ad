import os

# Tests never touch the network: datasets build offline into the repo's data dir (cached
# across runs) unless MTFL_DATA_DIR says otherwise.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")


import tempfile

# Profiles and virtual-resource calibrations that tests measure go to a scratch folder, not
# into data/profiles/ of the checkout.
os.environ.setdefault("MTFL_PROFILE_DIR", tempfile.mkdtemp(prefix="mtfl_profiles_"))
