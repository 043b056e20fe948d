#!/usr/bin/env python
"""The Ray job driver, for ``ray job submit``: run it inside the cluster with Hydra overrides.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launchers/ray_job.py launcher.num_workers=4 model=tiny \\
        parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2

A thin wrapper over :mod:`megaglm.launch.ray` (what ``megaglm-ray submit`` runs); ``launcher.*``
overrides configure the launcher (``conf/launcher/``), all others go unchanged to every rank.
"""

from megaglm.launch.ray import main

if __name__ == "__main__":
    main()
