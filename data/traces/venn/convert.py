"""Converts Venn's pickled device table ``client_spec_speed`` into ``client_spec_speed.json``.

The pickle is kept byte-identical beside this script (its sha256 is in SOURCE.md); the package
reads only the JSON, so no pickle is ever loaded at run time. The pickle is opened with an
unpickler that refuses every global: the table is plain dicts, strings and floats, and nothing
else may be built while reading it. Rows are written in the order of their integer key (the
device's rank in AI-Benchmark's ranking when the table was made), one row per line, with the
original field names and values unchanged.

Run from anywhere: ``python data/traces/venn/convert.py``.
"""
import json
import pickle
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIELDS = ("device", "cpu_f", "ram", "fp16_mem", "android_os", "speed")


class PlainUnpickler(pickle.Unpickler):
  """Builds only pickle's own types (dict, list, str, float, int); any other class is refused."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to build {module}.{name}: the device table holds plain data only")


def read_pickle(path=HERE / "client_spec_speed") -> dict:
  with open(path, "rb") as f:
    return PlainUnpickler(f).load()


def rows(table: dict) -> list[dict]:
  return [{"id": k, **{f: table[k][f] for f in FIELDS}} for k in sorted(table)]


def main():
  table = read_pickle()
  assert all(set(v) == set(FIELDS) for v in table.values()), "unexpected fields in the device table"
  text = "[\n" + ",\n".join(json.dumps(r) for r in rows(table)) + "\n]\n"
  (HERE / "client_spec_speed.json").write_text(text)
  print(f"wrote {len(table)} rows to {HERE / 'client_spec_speed.json'}")


if __name__ == "__main__":
  main()
