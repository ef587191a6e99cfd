#!/bin/bash
# issue 15, sixth step: the fast preset with its gray first block as one function (conv -> batch norm
# -> ReLU -> pool, statistics in closed form: kernels/conv_pool.py) and inference with the batch norms
# folded (kernels/folded.py), against the fifth step's kernels (both switched off: "fifth") and the
# plain path (--kernels plain), alternating, three rounds. Run alone, from this folder.
PY=../../../.venv/bin/python
export VGGKIT_DATA=${VGGKIT_DATA:-../../../../shared/data} PYTHONPATH=../../../src
bench() {  # bench NAME KERNELS NEW
  local pre=""
  [ "$3" = off ] && pre="import vggkit.kernels as k; k.conv_batch_norm_pool_faster = k.block_foldable = lambda *a: False"
  $PY -c "$pre
import sys; from vggkit.cli import main
sys.exit(main(['bench', '--preset', 'fast', '--runs', '3', '--no-peak', '--kernels', '$2', '--json']))" > $1.json 2> $1.err
}
for round in 1 2 3; do
  bench plain_$round plain on
  bench fifth_$round fast off
  bench sixth_$round fast on
done
echo done
