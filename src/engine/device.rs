//! Device and dtype selection (flags shared by the server and the subcommands).

use anyhow::{Context, Result};
use candle_core::{DType, Device};

/// Device and dtype selection shared by the subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Run on the GPU (needs a build with the `cuda` feature).
    #[arg(long, env = "SDSERVE_CUDA", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub cuda: bool,
    /// Compute precision: f32, f16 or bf16 (f16/bf16 only make sense on a GPU).
    #[arg(long, default_value = "f32", env = "SDSERVE_DTYPE")]
    pub dtype: String,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<Device> {
        if self.cuda {
            Device::new_cuda(0).context("cannot open CUDA device 0")
        } else {
            Ok(Device::Cpu)
        }
    }

    pub fn dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => anyhow::bail!("unknown dtype {other:?} (expected f32, f16 or bf16)"),
        }
    }
}
