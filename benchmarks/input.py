"""Throughput of the training input pipeline (examples/s) for several worker counts, and the
time one example takes to read, decode, augment and tokenize in one thread without grain.

python benchmarks/input.py                       # default pipeline (mmret_world/tiny)
python benchmarks/input.py --workers 0,2,4 --batches 50 --dataset /path/to/tfds/dir
python benchmarks/input.py --workers 0 --read_threads 1,2,4    # read threads in the main process
"""

import argparse
import time

import numpy as np

from absl import flags

from mmret.data import pipeline


def parse_args():
  defaults = pipeline.default_input_config()
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      "--dataset",
      default=defaults.train[0]["dataset"],
      help="registered tfds name/config or prepared dataset directory",
  )
  parser.add_argument("--split", default=defaults.train[0]["split"])
  parser.add_argument("--data_dir", default=defaults.data_dir)
  parser.add_argument("--tokenizer", default=defaults.tokenizer)
  parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
  parser.add_argument("--image_size", type=int, default=defaults.image_size)
  parser.add_argument("--max_text_len", type=int, default=defaults.max_text_len)
  parser.add_argument("--workers", default="0,2,4", help="comma-separated worker counts to measure")
  parser.add_argument(
      "--read_threads",
      default=str(defaults.read_threads),
      help="comma-separated read-thread counts to measure (each with every worker count)",
  )
  parser.add_argument("--batches", type=int, default=50, help="batches timed per setting")
  parser.add_argument(
      "--warmup", type=int, default=5, help="batches read before timing (worker start-up, caches)"
  )
  return parser.parse_args()


def examples_per_second(input_cfg, *, batches: int, warmup: int) -> float:
  iterator = pipeline.make_train_iterator(input_cfg, seed=0)
  try:
    for _ in range(warmup):
      next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    elapsed = time.perf_counter() - start
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
  return batches * input_cfg.batch_size / elapsed


def milliseconds_per_example(input_cfg, *, examples: int) -> float:
  """Mean time of one ``TrainExample`` call over shuffled records (one thread, no grain)."""
  record_sources, _ = pipeline.open_train_sources(input_cfg)
  make_example = pipeline.TrainExample(
      input_cfg,
      record_sources,
      seed=0,
      process_index=0,
      process_count=1,
      with_ground_truth=pipeline.has_ground_truth(record_sources),
  )
  order = np.random.default_rng(0).permutation(len(record_sources[0]))
  indices = [int(order[i % len(order)]) for i in range(examples)]
  for position, index in enumerate(indices[:50]):  # warm-up
    make_example(position, (0, index))
  start = time.perf_counter()
  for position, index in enumerate(indices):
    make_example(position, (0, index))
  return (time.perf_counter() - start) / examples * 1e3


def main():
  args = parse_args()
  flags.FLAGS.mark_as_parsed()  # worker processes expect parsed absl flags
  input_cfg = pipeline.default_input_config()
  input_cfg.train = [{"dataset": args.dataset, "split": args.split, "weight": 1.0}]
  input_cfg.data_dir = args.data_dir
  input_cfg.tokenizer = args.tokenizer
  input_cfg.batch_size = args.batch_size
  input_cfg.image_size = args.image_size
  input_cfg.max_text_len = args.max_text_len
  print(
      f"{args.dataset}:{args.split} batch {args.batch_size} image {args.image_size} "
      f"text {args.max_text_len}"
  )
  for workers in (int(w) for w in args.workers.split(",")):
    for threads in (int(t) for t in args.read_threads.split(",")):
      input_cfg.worker_count, input_cfg.read_threads = workers, threads
      rate = examples_per_second(input_cfg, batches=args.batches, warmup=args.warmup)
      print(f"workers={workers:2d}  read_threads={threads:2d}  {rate:10.1f} examples/s")
  examples = args.batches * args.batch_size
  ms = milliseconds_per_example(input_cfg, examples=examples)
  print(f"one example, one thread, no grain: {ms:.3f} ms ({1e3 / ms:.1f} examples/s)")


if __name__ == "__main__":
  main()
