"""The training half: distillation of student encoders (Collaborative Distillation, knowledge review) and their decoders.

- `data`: seeded random-crop streams over image folders;
- `tasks`: collaborator decoder, student encoder (Q_k embeddings), student decoder;
- `review`: knowledge review's training-only ABF modules and hierarchical context loss;
- `prune`: L1-norm filter pruning, the student's starting point; `fit`: data-driven pruning;
- `losses`: the training losses; `sources`: where teacher and collaborator networks come from;
- `trainer`: the loop, checkpoints, resume, Ctrl-C; `logs`: CSV and PNG;
- `config`, `jobs`: whole runs from a resolved configuration;
- `outputs`: trained weights as a CD-format model folder; `metrics`: PSNR/SSIM.
"""
