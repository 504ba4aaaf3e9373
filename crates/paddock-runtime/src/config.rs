//! `wasi:config/store` (0.2.0-rc.1): the app's `[config]`, the same entries its environment
//! holds, read by key or all at once.

use wasmtime::component::{HasSelf, Linker};

use crate::host::Host;

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "paddock:host/config",
    });
}

use bindings::wasi::config::store;

pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> anyhow::Result<()> {
    store::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host).map_err(anyhow::Error::from)
}

impl store::Host for Host {
    fn get(&mut self, key: String) -> Result<Option<String>, store::Error> {
        Ok(self
            .config
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, value)| value.clone()))
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, store::Error> {
        Ok(self.config.to_vec())
    }
}
