"""Model families built on megatron-core (currently GLM: :mod:`megaglm.models.glm`)."""
