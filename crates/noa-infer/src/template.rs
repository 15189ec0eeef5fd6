//! Chat templates: the Jinja template a GGUF file carries (`tokenizer.chat_template`), rendered with minijinja the
//! way Hugging Face's `apply_chat_template` and llama-server do, so a model gets its own prompt format, with the
//! tools of a request when its template takes them.
//!
//! llama.cpp's own `llama_chat_apply_template` only recognizes a fixed list of formats and knows nothing of tools;
//! it stays the fallback for a template this renderer cannot run.

use minijinja::{Environment, Error, ErrorKind, Value};

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the template reads `tools` (then a request's tools are given to it, in the model's own format).
    takes_tools: bool,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("takes_tools", &self.takes_tools)
            .finish_non_exhaustive()
    }
}

/// The current time (UTC) in a strftime `format`, for templates that print today's date.
fn strftime_now(format: String) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Utc::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: {format:?} is not a strftime format"),
        )
    })?;
    Ok(out)
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the model's special tokens as text (templates print them).
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        // As transformers renders chat templates.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| format!("the template syntax cannot be set up: {e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            takes_tools: source.contains("tools"),
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    pub fn takes_tools(&self) -> bool {
        self.takes_tools
    }

    /// The model's BOS token as text (what a template prints for `bos_token`).
    pub fn bos(&self) -> &str {
        &self.bos
    }

    /// Renders `messages` (`{"role", "content"}` objects) with the prompt for the assistant's turn, and `tools`
    /// (OpenAI's list of `{"type": "function", "function": {...}}`) if given.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| format!("the chat template is missing: {e}"))?;
        template
            .render(minijinja::context! {
                messages => Value::from(minijinja::value::Serde(messages)),
                tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
                add_generation_prompt => true,
                bos_token => self.bos.as_str(),
                eos_token => self.eos.as_str(),
            })
            .map_err(|e| format!("the chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// The tools part of Qwen2.5's template (Hermes-style), as its GGUF files carry it.
    const QWEN: &str = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags<|im_end|>\\n\" }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn the_bundled_models_template_renders_as_transformers_does() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        assert!(!t.takes_tools());
        let out = t
            .render(&json!([{"role": "user", "content": "hi"}]), None)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn tools_go_into_a_template_that_takes_them() {
        let t = ChatTemplate::new(QWEN, "", "<|im_end|>").unwrap();
        assert!(t.takes_tools());
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let out = t
            .render(
                &json!([{"role": "user", "content": " Weather in Paris? "}]),
                Some(&tools),
            )
            .unwrap();
        assert!(
            out.contains("<tools>\n{\"function\": {\"name\": \"get_weather\""),
            "{out}"
        );
        assert!(
            out.contains("<|im_start|>user\nWeather in Paris?<|im_end|>"),
            "{out}"
        );
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
        let plain = t
            .render(&json!([{"role": "user", "content": "hi"}]), None)
            .unwrap();
        assert!(!plain.contains("<tools>"));
    }

    #[test]
    fn a_broken_template_is_an_error_not_a_panic() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t.render(&json!([]), None).unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "").unwrap();
        let date = t.render(&json!([]), None).unwrap();
        assert_eq!(date.len(), 11, "{date}");
    }
}
