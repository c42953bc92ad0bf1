//! A small CLIP BPE tokenizer for a closed vocabulary, in the transformers file format
//! (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`).
//!
//! The vocabulary is GPT-2's 256 byte symbols (with and without the `</w>` end-of-word
//! suffix), one merge chain per word, and the two special tokens, so any text still
//! tokenizes (unknown words fall back to byte symbols).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::Result;
use serde_json::json;

use crate::model::tokenizer::bytes_to_unicode;

/// Writes the tokenizer files for `words` into `dir`; `max_length` is the padded length.
pub fn write_tokenizer(dir: &Path, words: &[&str], max_length: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let chars: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
    let mut vocab: Vec<String> = chars.clone();
    vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
    let mut known: HashSet<String> = vocab.iter().cloned().collect();
    let mut merges: Vec<String> = Vec::new();
    let mut seen_merges = HashSet::new();
    for word in words {
        let table = bytes_to_unicode();
        let symbols: Vec<String> = word.bytes().map(|b| table[b as usize].to_string()).collect();
        let Some((last, init)) = symbols.split_last() else { continue };
        let mut toks: Vec<String> = init.to_vec();
        toks.push(format!("{last}</w>"));
        while toks.len() > 1 {
            let merged = format!("{}{}", toks[0], toks[1]);
            let rule = format!("{} {}", toks[0], toks[1]);
            if seen_merges.insert(rule.clone()) {
                merges.push(rule);
            }
            if known.insert(merged.clone()) {
                vocab.push(merged.clone());
            }
            toks.splice(0..2, [merged]);
        }
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let ids: BTreeMap<&str, usize> = vocab.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&ids)?)?;
    std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n")))?;
    let config = json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": true,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    let specials = json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    });
    std::fs::write(dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&specials)?)?;
    Ok(())
}

/// Size of the vocabulary [`write_tokenizer`] produces for `words`.
pub fn vocab_size(dir: &Path) -> Result<usize> {
    let vocab: BTreeMap<String, u32> = serde_json::from_str(&std::fs::read_to_string(dir.join("vocab.json"))?)?;
    Ok(vocab.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::ClipTokenizer;

    #[test]
    fn every_word_is_one_token_and_other_text_still_encodes() {
        let dir = std::env::temp_dir().join(format!("sdserve-vocab-{}", std::process::id()));
        write_tokenizer(&dir, &["two", "red", "circles", "and", "a"], 16).unwrap();
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.max_length(), 16);
        assert_eq!(tok.tokenize("two red circles and a").len(), 5);
        assert_eq!(tok.tokenize("Two  RED circles").len(), 3);
        assert!(tok.tokenize("zebra").len() > 1);
        let ids = tok.encode("two red circles").unwrap();
        assert_eq!(ids.len(), 16);
        assert_eq!(ids[0], tok.bos_id());
    }
}
