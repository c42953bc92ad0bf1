//! What each tensor key of an adapter file holds, by its suffix.

use super::LoraFormat;

/// The part of a module's update a tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Down,
    Up,
    /// LoCon's Tucker core (`lora_mid.weight`).
    Mid,
    Alpha,
    /// peft's DoRA magnitude (`lora_magnitude_vector`), one per output row.
    Magnitude,
    /// LyCORIS's DoRA magnitude (`dora_scale`), per output row or per input channel.
    DoraScale,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
}

impl Role {
    /// The role of a kohya / LyCORIS key's suffix (what follows the module name's dot).
    pub fn kohya(suffix: &str) -> Option<Role> {
        Some(match suffix {
            "lora_down.weight" => Role::Down,
            "lora_up.weight" => Role::Up,
            "lora_mid.weight" => Role::Mid,
            "alpha" => Role::Alpha,
            "dora_scale" => Role::DoraScale,
            "hada_w1_a" => Role::HadaW1A,
            "hada_w1_b" => Role::HadaW1B,
            "hada_w2_a" => Role::HadaW2A,
            "hada_w2_b" => Role::HadaW2B,
            "hada_t1" => Role::HadaT1,
            "hada_t2" => Role::HadaT2,
            "lokr_w1" => Role::LokrW1,
            "lokr_w1_a" => Role::LokrW1A,
            "lokr_w1_b" => Role::LokrW1B,
            "lokr_w2" => Role::LokrW2,
            "lokr_w2_a" => Role::LokrW2A,
            "lokr_w2_b" => Role::LokrW2B,
            "lokr_t2" => Role::LokrT2,
            _ => return None,
        })
    }

    pub fn is_hada(self) -> bool {
        matches!(
            self,
            Role::HadaW1A | Role::HadaW1B | Role::HadaW2A | Role::HadaW2B | Role::HadaT1 | Role::HadaT2
        )
    }

    pub fn is_lokr(self) -> bool {
        matches!(
            self,
            Role::LokrW1
                | Role::LokrW1A
                | Role::LokrW1B
                | Role::LokrW2
                | Role::LokrW2A
                | Role::LokrW2B
                | Role::LokrT2
        )
    }

    /// Whether the tensor is a weight factor (not alpha, not a DoRA magnitude).
    pub fn is_factor(self) -> bool {
        !matches!(self, Role::Alpha | Role::Magnitude | Role::DoraScale)
    }
}

/// Key suffixes of the dotted formats (diffusers, peft), with the format they mark (`None`
/// for suffixes both may carry).
pub const DOTTED: [(&str, Option<LoraFormat>, Role); 9] = [
    (".lora.down.weight", Some(LoraFormat::Diffusers), Role::Down),
    (".lora.up.weight", Some(LoraFormat::Diffusers), Role::Up),
    (".lora_linear_layer.down.weight", Some(LoraFormat::Diffusers), Role::Down),
    (".lora_linear_layer.up.weight", Some(LoraFormat::Diffusers), Role::Up),
    (".lora_A.weight", Some(LoraFormat::Peft), Role::Down),
    (".lora_B.weight", Some(LoraFormat::Peft), Role::Up),
    (".lora_magnitude_vector", None, Role::Magnitude),
    (".lora_magnitude_vector.weight", None, Role::Magnitude),
    (".alpha", None, Role::Alpha),
];
