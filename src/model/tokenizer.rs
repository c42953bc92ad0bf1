//! The CLIP byte-level BPE tokenizer, matching transformers' `CLIPTokenizer(Fast)` on the
//! `tokenizer/` folders of SD 1.x and 2.x (`vocab.json`, `merges.txt`,
//! `tokenizer_config.json`, optionally `special_tokens_map.json`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::Value;

use crate::model::config::SpecialToken;

/// Sequence length when `model_max_length` is missing or one of transformers' "unset"
/// sentinels (1e30).
const DEFAULT_MAX_LENGTH: usize = 77;
/// Larger `model_max_length` values are treated as unset.
const MAX_SANE_LENGTH: f64 = 65536.0;
/// transformers reads only this many merges (CLIP's 49152-token BPE less bytes and specials).
const MAX_MERGES: usize = 49152 - 256 - 2;
/// Cached words are dropped once the cache holds this many.
const CACHE_LIMIT: usize = 65536;

/// CLIP's pre-tokenizer pattern (transformers `CLIPTokenizer.pat`).
const CLIP_PATTERN: &str = r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The fast tokenizer's ByteLevel pre-tokenizer (GPT-2 pattern) applied to each CLIP piece.
/// Pieces hold no whitespace, so the whitespace alternatives are left out; in effect this
/// only splits a lowercased special-token string such as `<|ENDOFTEXT|>` typed in a prompt.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer: lowercasing, regex pre-tokenization, byte-to-unicode mapping and BPE
/// with a `</w>` end-of-word suffix; `encode` adds bos/eos and pads to `max_length`.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    clip_re: Regex,
    byte_level_re: Regex,
    /// Special tokens matched verbatim in the raw text (bos, eos, unk, pad), with their ids.
    specials: Vec<(String, u32)>,
    bos: u32,
    eos: u32,
    pad: u32,
    unk: u32,
    max_length: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipTokenizer {
    /// Loads a transformers tokenizer folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let text = std::fs::read_to_string(&vocab_path).with_context(|| {
            format!("cannot read tokenizer vocabulary {}", vocab_path.display())
        })?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&text)
            .with_context(|| format!("invalid tokenizer vocabulary {}", vocab_path.display()))?;
        let merges_path = dir.join("merges.txt");
        let merges = std::fs::read_to_string(&merges_path)
            .with_context(|| format!("cannot read tokenizer merges {}", merges_path.display()))?;
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        Self::new(vocab, &merges, &config, &special_map)
            .with_context(|| format!("invalid tokenizer in {}", dir.display()))
    }

    /// Builds a tokenizer from a vocabulary, the text of `merges.txt` and the parsed
    /// `tokenizer_config.json` / `special_tokens_map.json` (`Value::Null` when absent).
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: &str,
        config: &Value,
        special_map: &Value,
    ) -> Result<Self> {
        let mut ranks = HashMap::new();
        let lines = merges
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.starts_with("#version"));
        for (rank, (line_no, line)) in lines.take(MAX_MERGES).enumerate() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts[..] {
                [a, b] => {
                    ranks.entry((a.to_owned(), b.to_owned())).or_insert(rank);
                }
                [] => {}
                _ => bail!(
                    "merges.txt line {}: expected two symbols, got {line:?}",
                    line_no + 1
                ),
            }
        }

        let token = |name: &str, default: &str| -> Result<(String, u32)> {
            let content = special_token(config, name)
                .or_else(|| special_token(special_map, name))
                .unwrap_or_else(|| default.to_owned());
            let id = *vocab
                .get(&content)
                .with_context(|| format!("{name} {content:?} is not in the vocabulary"))?;
            Ok((content, id))
        };
        let bos = token("bos_token", "<|startoftext|>")?;
        let eos = token("eos_token", "<|endoftext|>")?;
        let unk = token("unk_token", "<|endoftext|>")?;
        let pad = token("pad_token", "<|endoftext|>")?;
        let (bos_id, eos_id, unk_id, pad_id) = (bos.1, eos.1, unk.1, pad.1);
        let mut specials = vec![bos, eos, unk, pad];
        specials.sort();
        specials.dedup();

        let max_length = match config.get("model_max_length").and_then(Value::as_f64) {
            Some(n) if n > MAX_SANE_LENGTH => DEFAULT_MAX_LENGTH,
            Some(n) if n < 2.0 || n.fract() != 0.0 => {
                bail!("model_max_length {n} leaves no room for bos and eos")
            }
            Some(n) => n as usize,
            None => DEFAULT_MAX_LENGTH,
        };

        Ok(Self {
            vocab,
            ranks,
            byte_chars: bytes_to_unicode(),
            clip_re: Regex::new(CLIP_PATTERN)?,
            byte_level_re: Regex::new(BYTE_LEVEL_PATTERN)?,
            specials,
            bos: bos_id,
            eos: eos_id,
            pad: pad_id,
            unk: unk_id,
            max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Length of every encoded sequence (bos + tokens + eos + padding).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Most content tokens that fit in one sequence without truncation.
    pub fn max_content_tokens(&self) -> usize {
        self.max_length - 2
    }

    /// `[bos, tokens…, eos, pad…]`, exactly `max_length` ids; tokens beyond
    /// `max_content_tokens` are dropped (transformers' `truncation=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenize(text);
        ids.truncate(self.max_content_tokens());
        ids.insert(0, self.bos);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// Number of content tokens in `text` before truncation (bos and eos not counted).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenize(text).len()
    }

    /// The content token ids of `text`, without bos/eos and untruncated.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The leftmost special token, the longest one where several start there.
            let found = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|pos| (pos, s.len(), *id)))
                .min_by_key(|&(pos, len, _)| (pos, std::cmp::Reverse(len)));
            let (plain, special) = match found {
                Some((pos, len, id)) => (&rest[..pos], Some((len, id))),
                None => (rest, None),
            };
            self.tokenize_plain(plain, &mut ids);
            match special {
                Some((len, id)) => {
                    ids.push(id);
                    rest = &rest[plain.len() + len..];
                }
                None => break,
            }
        }
        ids
    }

    /// Tokenizes text that holds no special token.
    fn tokenize_plain(&self, text: &str, ids: &mut Vec<u32>) {
        // The fast tokenizer's normalizer (whitespace runs are dropped by the pattern anyway).
        let text: String = text.chars().flat_map(char::to_lowercase).collect();
        for piece in self.clip_re.find_iter(&text) {
            for word in self.byte_level_re.find_iter(piece.as_str()) {
                let mapped: String = word
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_chars[b as usize])
                    .collect();
                ids.extend(self.bpe_cached(&mapped));
            }
        }
    }

    fn bpe_cached(&self, word: &str) -> Vec<u32> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = cache.get(word) {
            return ids.clone();
        }
        let ids = self.bpe(word);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(word.to_owned(), ids.clone());
        ids
    }

    /// Byte-pair encoding of one byte-mapped word: repeatedly merges every occurrence of the
    /// lowest-ranked adjacent pair; unknown symbols become `unk`.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w))
                })
                .min_by_key(|&(r, _)| r)
                .map(|(_, w)| (w[0].clone(), w[1].clone()));
            let Some((first, second)) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
            .iter()
            .map(|s| self.vocab.get(s).copied().unwrap_or(self.unk))
            .collect()
    }
}

/// A special token field given as a string or `{"content": ...}`.
fn special_token(json: &Value, name: &str) -> Option<String> {
    let token: SpecialToken = serde_json::from_value(json.get(name)?.clone()).ok()?;
    Some(token.content().to_owned())
}

/// Parses a JSON file, or gives `Value::Null` if there is none.
fn read_optional_json(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

/// GPT-2's reversible byte → printable-character table (`bytes_to_unicode`).
pub fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("code points 256..324 are valid")
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer over the byte alphabet (with and without `</w>`) plus a few merges.
    fn tiny(merges: &str, config: Value) -> ClipTokenizer {
        let mut vocab = HashMap::new();
        for c in bytes_to_unicode() {
            let n = vocab.len() as u32;
            vocab.insert(c.to_string(), n);
        }
        for c in bytes_to_unicode() {
            let n = vocab.len() as u32;
            vocab.insert(format!("{c}</w>"), n);
        }
        for line in merges.lines().skip(1) {
            let n = vocab.len() as u32;
            vocab.insert(line.replace(' ', ""), n);
        }
        for t in ["<|startoftext|>", "<|endoftext|>"] {
            let n = vocab.len() as u32;
            vocab.insert(t.to_owned(), n);
        }
        ClipTokenizer::new(vocab, merges, &config, &Value::Null).unwrap()
    }

    fn fixture() -> ClipTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1/tokenizer");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let mut sorted = t.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn bpe_merges_by_rank_with_end_of_word() {
        let tok = tiny("#version: 0.2\nb c</w>\na b\na a\nh e\nhe l\n", Value::Null);
        let id = |s: &str| tok.vocab[s];
        // The lower-ranked pair wins wherever it is; `</w>` only on the last symbol.
        assert_eq!(tok.tokenize("abc"), vec![id("a"), id("bc</w>")]);
        assert_eq!(tok.tokenize("abd"), vec![id("ab"), id("d</w>")]);
        assert_eq!(tok.tokenize("ab"), vec![id("a"), id("b</w>")]);
        // All occurrences merge left to right.
        assert_eq!(tok.tokenize("aaaa"), vec![id("aa"), id("a"), id("a</w>")]);
        // Lowercased, and cached results are reused.
        assert_eq!(tok.tokenize("HELLO hello"), tok.tokenize("hello hello"));
        assert_eq!(tok.tokenize("hello")[..2], [id("hel"), id("l")]);
    }

    #[test]
    fn encode_pads_and_truncates() {
        let tok = tiny(
            "#version: 0.2\n",
            serde_json::json!({ "model_max_length": 6 }),
        );
        let (bos, eos) = (tok.bos_id(), tok.eos_id());
        let a = tok.vocab["a</w>"];
        assert_eq!(tok.encode("").unwrap(), vec![bos, eos, eos, eos, eos, eos]);
        assert_eq!(tok.encode("a a").unwrap(), vec![bos, a, a, eos, eos, eos]);
        assert_eq!(
            tok.encode("a a a a a a").unwrap(),
            vec![bos, a, a, a, a, eos]
        );
        assert_eq!(tok.count_tokens("a a a a a a"), 6);
    }

    #[test]
    fn pad_token_from_config_and_large_max_length() {
        let cfg = serde_json::json!({
            "pad_token": { "content": "!", "lstrip": false },
            "model_max_length": 1e30,
        });
        let tok = tiny("#version: 0.2\n", cfg);
        assert_eq!(tok.max_length(), 77);
        assert_eq!(tok.pad_id(), tok.vocab["!"]);
        let ids = tok.encode("a").unwrap();
        assert_eq!(ids[2], tok.eos_id());
        assert!(ids[3..].iter().all(|&i| i == tok.pad_id()));
        // transformers matches special tokens verbatim: SD 2.x's pad token "!" encodes as 0.
        assert_eq!(tok.tokenize("a!"), vec![tok.vocab["a</w>"], tok.pad_id()]);
    }

    #[test]
    fn pre_tokenization() {
        let tok = tiny("#version: 0.2\n", Value::Null);
        let id = |s: &str| tok.vocab[s];
        // Contractions, single digits, punctuation runs; whitespace dropped.
        assert_eq!(
            tok.tokenize("it's 42!?\n"),
            vec![
                id("i"),
                id("t</w>"),
                id("'"),
                id("s</w>"),
                id("4</w>"),
                id("2</w>"),
                id("!"),
                id("?</w>")
            ]
        );
        // Special tokens typed verbatim are kept whole; other case variants are split.
        assert_eq!(tok.tokenize("<|endoftext|>"), vec![tok.eos_id()]);
        assert_eq!(
            tok.tokenize("<|EndOfText|>").len(),
            2 + "endoftext".len() + 2
        );
        // Non-ASCII letters go through the byte table (é is two bytes).
        assert_eq!(tok.tokenize("é"), vec![id("Ã"), id("©</w>")]);
    }

    #[test]
    fn fixture_prompts() {
        let tok = fixture();
        let ids = tok.encode("two red circles and a blue square").unwrap();
        assert_eq!(&ids[..9], &[574, 555, 516, 535, 563, 320, 523, 540, 575]);
        assert!(ids[9..].iter().all(|&i| i == 575));
        assert_eq!(ids.len(), 77);
        assert_eq!(tok.count_tokens("two red circles and a blue square"), 7);
    }

    #[test]
    fn missing_files_are_named() {
        let err = ClipTokenizer::from_dir(Path::new("/nonexistent/tok"))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("vocab.json"), "{err:#}");
    }
}
