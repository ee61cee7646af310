//! Training data: windows of a calibration text (`heal`) and chat-formatted examples
//! (`finetune`), both untrusted input, refused with the line or the count at fault.

use anyhow::{anyhow, bail, Context, Result};
use runtime::chat_template::{ChatTemplate, Message};
use runtime::tokenizer::Tokenizer;

use super::train::Example;

/// Windows of `seq_len` tokens over `tokens`, overlapping by half (a stride of `seq_len / 2`),
/// the last one ending at the last token. Errors when the text is shorter than one window.
pub fn windows(tokens: &[u32], seq_len: usize, what: &str) -> Result<Vec<Example>> {
    if seq_len < 2 {
        bail!("--seq-len {seq_len}: a training sequence needs at least 2 tokens");
    }
    if tokens.len() < seq_len {
        bail!(
            "the {what} has {} tokens, shorter than one training sequence (--seq-len {seq_len}); give a longer text or a shorter --seq-len",
            tokens.len()
        );
    }
    let stride = (seq_len / 2).max(1);
    let mut starts: Vec<usize> = (0..=tokens.len() - seq_len).step_by(stride).collect();
    if *starts.last().unwrap() != tokens.len() - seq_len {
        starts.push(tokens.len() - seq_len);
    }
    Ok(starts.into_iter().map(|s| Example::text(tokens[s..s + seq_len].to_vec())).collect())
}

/// Non-overlapping windows of at most `seq_len` over the first `cap` tokens (for evaluation).
pub fn chunks(tokens: &[u32], seq_len: usize, cap: usize) -> Vec<Example> {
    tokens[..tokens.len().min(cap)]
        .chunks(seq_len)
        .filter(|c| c.len() >= 2)
        .map(|c| Example::text(c.to_vec()))
        .collect()
}

/// The tokens of a text file (read whole; at most 64 MiB).
pub fn text_tokens(tokenizer: &Tokenizer, path: &std::path::Path, bos: Option<u32>) -> Result<Vec<u32>> {
    let text = read_text(path)?;
    let mut ids: Vec<u32> = bos.into_iter().collect();
    ids.extend(tokenizer.encode(&text, false).map_err(|e| anyhow!("tokenizing {}: {e}", path.display()))?);
    Ok(ids)
}

/// A text kiln ships (`kiln:calib.txt`, see `eval::data`) or a UTF-8 file of at most 64 MiB.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    if let Some(text) = eval::data::embedded(path) {
        return Ok(text.to_string());
    }
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > 64 << 20 {
        bail!("{} is {} bytes; texts of more than 64 MiB are not read", path.display(), meta.len());
    }
    std::fs::read_to_string(path).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// Reads a JSON Lines file of chat examples: each line an object with `messages` (a list of
/// `{"role", "content"}`, roles system/user/assistant) or with `prompt` and `completion`
/// strings. Each is rendered with the model's chat template and tokenized; the loss counts the
/// tokens of the assistant turns (their text and end-of-turn marker), nothing of the prompt.
/// Examples longer than `seq_len` tokens are cut (counted in the returned number).
pub fn chat_examples(
    path: &std::path::Path,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    seq_len: usize,
    bos: Option<u32>,
) -> Result<(Vec<Example>, usize)> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() || meta.len() > 256 << 20 {
        bail!("{} is not a regular file of at most 256 MiB", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    let mut out = vec![];
    let mut cut = 0;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| anyhow!("{} line {line_no}: {m}", path.display());
        let row: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not valid JSON ({e})")))?;
        let messages = parse_row(&row).map_err(at)?;
        let (mut example, was_cut) = render(&messages, template, tokenizer, seq_len, bos).map_err(at)?;
        if example.mask.iter().all(|&m| !m) {
            return Err(at("no answer token is left within --seq-len".into()));
        }
        example.tokens.shrink_to_fit();
        cut += was_cut as usize;
        out.push(example);
    }
    if out.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok((out, cut))
}

fn parse_row(row: &serde_json::Value) -> Result<Vec<Message>, String> {
    let obj = row.as_object().ok_or("a row must be a JSON object")?;
    if let Some(messages) = obj.get("messages") {
        let list = messages.as_array().ok_or("\"messages\" must be a list")?;
        let mut out = vec![];
        for (j, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(|r| r.as_str()).ok_or(format!("message {j} has no string \"role\""))?;
            if !matches!(role, "system" | "user" | "assistant") {
                return Err(format!("message {j} has role {role:?}; expected system, user or assistant"));
            }
            let content =
                m.get("content").and_then(|c| c.as_str()).ok_or(format!("message {j} has no string \"content\""))?;
            out.push(Message::new(role, content));
        }
        if !out.iter().any(|m| m.role == "assistant") {
            return Err("no assistant message: nothing to learn".into());
        }
        Ok(out)
    } else if let (Some(p), Some(c)) = (obj.get("prompt"), obj.get("completion")) {
        let (Some(p), Some(c)) = (p.as_str(), c.as_str()) else {
            return Err("\"prompt\" and \"completion\" must be strings".into());
        };
        Ok(vec![Message::user(p), Message::assistant(c)])
    } else {
        Err("expected \"messages\" or \"prompt\" and \"completion\"".into())
    }
}

fn render(
    messages: &[Message],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    seq_len: usize,
    bos: Option<u32>,
) -> Result<(Example, bool), String> {
    let full = template.render(messages, false).map_err(|e| format!("the chat template failed: {e}"))?;
    let tokens = tokenizer.encode(&full, true).map_err(|e| e.to_string())?;
    let mut mask = vec![false; tokens.len().saturating_sub(1)];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true).map_err(|e| format!("the chat template failed: {e}"))?;
        let through = template.render(&messages[..=i], false).map_err(|e| format!("the chat template failed: {e}"))?;
        let start = tokenizer.encode(&before, true).map_err(|e| e.to_string())?.len();
        let end = tokenizer.encode(&through, true).map_err(|e| e.to_string())?.len().min(tokens.len());
        // Position p predicts token p + 1: the answer's tokens start..end are predicted from start - 1.
        for p in start.saturating_sub(1)..end.saturating_sub(1) {
            if let Some(x) = mask.get_mut(p) {
                *x = true;
            }
        }
    }
    let mut tokens = tokens;
    if let Some(b) = bos {
        tokens.insert(0, b);
        mask.insert(0, false);
    }
    let was_cut = tokens.len() > seq_len;
    tokens.truncate(seq_len);
    mask.truncate(tokens.len().saturating_sub(1));
    if tokens.len() < 2 {
        return Err("the rendered example has fewer than 2 tokens".into());
    }
    Ok((Example { tokens, mask }, was_cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_text_and_refuse_a_short_one() {
        let t: Vec<u32> = (0..10).collect();
        let w = windows(&t, 4, "text").unwrap();
        let starts: Vec<u32> = w.iter().map(|e| e.tokens[0]).collect();
        assert_eq!(starts, vec![0, 2, 4, 6]);
        assert!(w.iter().all(|e| e.tokens.len() == 4 && e.mask.len() == 3));
        let err = windows(&t[..3], 4, "calibration text").unwrap_err().to_string();
        assert!(err.contains("3 tokens") && err.contains("--seq-len 4"), "{err}");
        assert_eq!(chunks(&t, 4, 9).len(), 2); // 4 + 4, and a last token with nothing to predict
        assert_eq!(chunks(&t, 4, 10).len(), 3);
    }

    #[test]
    fn rows_are_checked() {
        let bad = [
            (r#"[1]"#, "JSON object"),
            (r#"{"messages": 3}"#, "must be a list"),
            (r#"{"messages": [{"role": "user"}]}"#, "no string \"content\""),
            (r#"{"messages": [{"role": "robot", "content": "x"}]}"#, "role \"robot\""),
            (r#"{"messages": [{"role": "user", "content": "x"}]}"#, "no assistant"),
            (r#"{"prompt": "x", "completion": 3}"#, "must be strings"),
            (r#"{"text": "x"}"#, "expected \"messages\""),
        ];
        for (row, want) in bad {
            let v: serde_json::Value = serde_json::from_str(row).unwrap();
            let e = parse_row(&v).unwrap_err();
            assert!(e.contains(want), "{row}: {e}");
        }
        let v: serde_json::Value = serde_json::from_str(r#"{"prompt": "2+2?", "completion": "4"}"#).unwrap();
        let m = parse_row(&v).unwrap();
        assert_eq!((m[0].role.as_str(), m[1].role.as_str(), m[1].content.as_str()), ("user", "assistant", "4"));
    }
}
