//! kohya's SDXL UNet names. sd-scripts trains SDXL on the original Stability ("sgm") UNet, so
//! the `lora_unet_` keys of most shared SDXL LoRAs name `input_blocks` / `middle_block` /
//! `output_blocks` modules; this maps them to diffusers module names as diffusers' loader
//! does (`_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key`).

/// The diffusers name, in kohya's underscored form, of an sgm underscored module name
/// (`input_blocks_4_1_transformer_blocks_0_attn1_to_q` →
/// `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`); `None` when `name` is not
/// one. `layers_per_block` is the UNet's resnets per down block.
pub fn to_diffusers(name: &str, layers_per_block: usize) -> Option<String> {
    const OUTSIDE_BLOCKS: [(&str, &str); 6] = [
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
    ];
    if let Some((_, to)) = OUTSIDE_BLOCKS.iter().find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let per = layers_per_block + 1;
    let (outer, rest) = ["input_blocks_", "middle_block_", "output_blocks_"]
        .into_iter()
        .find_map(|p| name.strip_prefix(p).map(|rest| (p, rest)))?;
    let (index, tail) = rest.split_once('_')?;
    let index: usize = index.parse().ok()?;
    // Input and output blocks are sequences of [resnet, attention, up/downsampler] layers;
    // the mid block is the single sequence resnet, attention, resnet.
    let (block, kind, layer, inner) = match outer {
        "middle_block_" => match index {
            0 => ("mid_block".to_string(), "resnets", 0, tail),
            1 => ("mid_block".to_string(), "attentions", 0, tail),
            2 => ("mid_block".to_string(), "resnets", 1, tail),
            _ => return None,
        },
        "input_blocks_" if index >= 1 => {
            let (b, l) = ((index - 1) / per, (index - 1) % per);
            match tail.split_once('_')? {
                ("0", "op") => return Some(format!("down_blocks_{b}_downsamplers_0_conv")),
                ("0", inner) => (format!("down_blocks_{b}"), "resnets", l, inner),
                ("1", inner) => (format!("down_blocks_{b}"), "attentions", l, inner),
                _ => return None,
            }
        }
        "output_blocks_" => {
            let (b, l) = (index / per, index % per);
            match tail.split_once('_')? {
                ("0", inner) => (format!("up_blocks_{b}"), "resnets", l, inner),
                ("1", inner) => (format!("up_blocks_{b}"), "attentions", l, inner),
                ("2", inner) => (format!("up_blocks_{b}"), "upsamplers", 0, inner),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{block}_{kind}_{layer}_{}", resnet_inner(kind, inner)))
}

/// A resnet's sgm layer names → diffusers' (`in_layers_2` → `conv1`, …); others unchanged.
fn resnet_inner(kind: &str, name: &str) -> String {
    const RESNET: [(&str, &str); 4] =
        [("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut")];
    match RESNET.iter().find(|(from, _)| *from == name) {
        Some((_, to)) if kind == "resnets" => to.to_string(),
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::to_diffusers;

    #[test]
    fn sdxl_names() {
        // SDXL base: two resnets per down block, down blocks 0 (no attention), 1, 2.
        let cases = [
            ("input_blocks_0_0", "conv_in"),
            ("input_blocks_1_0_in_layers_2", "down_blocks_0_resnets_0_conv1"),
            ("input_blocks_2_0_emb_layers_1", "down_blocks_0_resnets_1_time_emb_proj"),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("input_blocks_4_0_skip_connection", "down_blocks_1_resnets_0_conv_shortcut"),
            ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
            ("input_blocks_8_1_proj_in", "down_blocks_2_attentions_1_proj_in"),
            ("middle_block_0_out_layers_3", "mid_block_resnets_0_conv2"),
            ("middle_block_1_transformer_blocks_9_ff_net_2", "mid_block_attentions_0_transformer_blocks_9_ff_net_2"),
            ("middle_block_2_in_layers_2", "mid_block_resnets_1_conv1"),
            ("output_blocks_0_0_skip_connection", "up_blocks_0_resnets_0_conv_shortcut"),
            ("output_blocks_2_1_transformer_blocks_0_attn2_to_out_0", "up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_out_0"),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_8_0_out_layers_3", "up_blocks_2_resnets_2_conv2"),
            ("out_2", "conv_out"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("label_emb_0_0", "add_embedding_linear_1"),
        ];
        for (sgm, diffusers) in cases {
            assert_eq!(to_diffusers(sgm, 2).as_deref(), Some(diffusers), "{sgm}");
        }
        for not_sgm in ["down_blocks_1_attentions_0_proj_in", "middle_block_7_x", "input_blocks_x_0", "conv_in"] {
            assert_eq!(to_diffusers(not_sgm, 2), None, "{not_sgm}");
        }
    }
}
