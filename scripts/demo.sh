#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job end to end on the bundled default: LeNet-5 on
# MNIST. Export -> dense reference (onnxruntime-training) -> Dynamic Network Surgery on a short
# schedule -> optimize (fold masks, remove dead channels, sparse storage) -> validate against the
# dense model on the MNIST test set. A few minutes on 2 cores; files land in demo-out/.
# Environment: DEMO_DENSE_EPOCHS (2), DEMO_DNS_ITERATIONS (3000), DEMO_THREADS (0: all cores),
# DEMO_OUT (demo-out).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

out=${DEMO_OUT:-demo-out}
dense_epochs=${DEMO_DENSE_EPOCHS:-2}
dns_iterations=${DEMO_DNS_ITERATIONS:-3000}
threads=${DEMO_THREADS:-0}
conv_phase=$((dns_iterations / 4))
fc_phase=$((dns_iterations / 2))
rm -rf "$out" && mkdir -p "$out"

echo "==> 1/5 export LeNet-5 (Caffe variant: conv 20, conv 50, fc 500, fc 10)"
onnxdns export lenet-5 -o "$out/lenet5.onnx"

echo "==> 2/5 dense reference: $dense_epochs epochs on MNIST with onnxruntime-training"
onnxdns train "$out/lenet5.onnx" -o "$out/dense.onnx" --method none --data mnist \
  --epochs "$dense_epochs" --lr 0.01 --schedule cosine --threads "$threads" --checkpoint-dir "$out/ckpt-dense"

# Sensitivities c (threshold mu + c*std of |W| per layer) are milder than the benchmark's
# (benchmarks/dns_lenet.py): a 2-epoch reference has lighter-tailed weights than a 10K-iteration one.
echo "==> 3/5 Dynamic Network Surgery: $dns_iterations iterations (conv phase, then fc phase)"
onnxdns train "$out/dense.onnx" -o "$out/dns.onnx" --method dns --data mnist \
  --iterations "$dns_iterations" --lr 0.01 --schedule cosine \
  --dns-phases "conv:$conv_phase,fc:$fc_phase" --dns-c "conv1=1.5,conv2=3,fc1=3,fc2=2" \
  --threads "$threads" --checkpoint-dir "$out/ckpt-dns"

echo "==> 4/5 optimize for the CPU provider (validated against its input by onnxruntime)"
onnxdns optimize "$out/dns.onnx" -o "$out/lenet5-small.onnx" --target cpu

echo "==> 5/5 validate: dense reference vs optimized model on the MNIST test set"
onnxdns validate "$out/dense.onnx" "$out/lenet5-small.onnx" --data mnist
ls -l "$out"/*.onnx
