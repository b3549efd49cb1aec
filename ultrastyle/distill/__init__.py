"""The training half: Collaborative Distillation of student encoders and their decoders (issue #5).

- `data`: seeded random-crop streams over image folders;
- `tasks`: collaborator decoder, student encoder (Q_k embeddings), student decoder;
- `prune`: L1-norm filter pruning, the student's starting point;
- `trainer`: the loop, checkpoints, resume, Ctrl-C; `logs`: CSV and PNG;
- `config`, `jobs`: whole runs from a resolved configuration;
- `outputs`: trained weights as a CD-format model folder; `metrics`: PSNR/SSIM.
"""
